"""Generated gRPC stubs and their .proto sources; regenerate with `python proto/generate.py`.

The stubs register their descriptors in ``POOL``, a private descriptor pool: the KServe
protocol's package name (``inference``) is shared with tritonclient's stubs, and two
registrations of one symbol in protobuf's default pool fail at import time.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
