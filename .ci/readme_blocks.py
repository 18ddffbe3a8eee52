"""Print the README's code blocks marked `<!-- ci: run -->` (the commands meant for a CPU), one per line,
so that CI runs them exactly as written."""

import re
import sys
from pathlib import Path

text = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text(encoding="utf-8")
blocks = re.findall(r"<!-- ci: run -->\s*```bash\n(.*?)```", text, flags=re.S)
if not blocks:
    sys.exit("README.md marks no code block with <!-- ci: run -->")
print("\n".join(block.strip() for block in blocks))
