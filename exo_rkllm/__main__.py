import sys

from exo_rkllm.cli import main

sys.exit(main())
