"""Print what a token-shard folder or a prototype .npz shard holds (a thin wrapper of `python -m spectra.explore`).

    python scripts/explore_shards.py data/sp-local --context-length 128 512
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's spectra, run from anywhere

from spectra.explore import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
