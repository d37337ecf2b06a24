"""Run several advinterp verbs in one process group, as many ``torchrun -m advinterp VERB``
launches would but paying the start-up once (for the tests)::

    torchrun --standalone --nproc-per-node 2 -m tests.analysis.run_verbs '[["semantics", ...]]'
"""

import json
import sys

from advinterp.cli import main
from advinterp.distributed import joined

if __name__ == "__main__":
    with joined():  # each verb finds the group joined and leaves it open
        for argv in json.loads(sys.argv[1]):
            status = main(argv)
            if status:
                sys.exit(status)
