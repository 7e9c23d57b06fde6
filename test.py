"""The seed's entry point, kept: `python test.py --resume CKPT --backbone unet ...` runs lib.evaluate."""
from lib.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
