"""`python -m rescascade.serve BUNDLE_DIR IMAGE...`: classify images with an exported bundle (no torch needed)."""
import sys

from .bundle import main

sys.exit(main())
