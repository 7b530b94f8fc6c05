"""The original SkinGPT-4 launch line, kept working:

python demo.py --cfg-path eval_configs/skingpt4_eval.yaml --gpu-id 0
"""

import sys

from skingpt4.cli.legacy import main

if __name__ == "__main__":
    sys.exit(main())
