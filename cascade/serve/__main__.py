"""`python -m rescascade.serve BUNDLE_DIR IMAGE...`: classify images with an exported bundle (no torch needed)."""
import sys

try:
    from .bundle import main
except ImportError as e:  # a bundle copied in part, or a machine without the runtime's three libraries
    missing = e.name or str(e)
    fix = "copy the whole bundle directory, or export it again (`rescascade export CASCADE_JSON --out DIR`)" \
        if missing.startswith("rescascade") else "pip install onnxruntime numpy pillow"
    print(f"error: the bundle's runtime cannot load: {missing} is missing; {fix}", file=sys.stderr)
    sys.exit(2)

sys.exit(main())
