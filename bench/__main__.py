"""``python -m bench``: see bench/cli.py. Kept tiny: the load processes are spawned and
re-import this module, which must not pull torch or grpc state into them."""

import sys

if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main())
