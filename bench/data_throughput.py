"""Ray Data vs single-process shard reading; prints the ratio per core. Same as
``dinor1 bench data``; run ``python bench/data_throughput.py --help`` for options."""

import sys

from dinor1.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "data", *sys.argv[1:]]))
