"""indexcache training: compose config -> build run -> train -> export (the story is `indexcache.main`).

    python train/main.py [conf=<preset>] [key=value ...]
    deepspeed [--num_gpus N] train/main.py conf=<preset> [key=value ...]

Both forms run the installed package (`pip install -e .` in a checkout); `indexcache-train` is the same command.
"""

import sys

from indexcache.main import main

if __name__ == "__main__":
    sys.exit(main())
