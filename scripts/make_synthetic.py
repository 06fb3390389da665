"""Write the derived test models (SmolLM2 Q8_0) into the model cache; see prima_ref/derived.py.

    python scripts/make_synthetic.py [--dst PATH] [--src PATH]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prima_ref.derived import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
