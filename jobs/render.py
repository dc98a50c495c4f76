"""Render a Parquet manifest of prompts into MP4s. See `python jobs/render.py --help`.

Run by hand it starts a local Ray; behind `ray job submit --working-dir . --` it attaches to the cluster.
"""

import os
import sys

# `ray job submit --working-dir .` runs this file from the uploaded directory; make the package importable
# there even when it is not pip-installed on the cluster.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from skyreels_batch.job.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
