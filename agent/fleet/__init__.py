"""The fleet side of the agent: the MQTT link to the fleet controller (``link``), and the
deployment documents, verifier, fetcher and deployer that build on it (STYLE §4)."""
