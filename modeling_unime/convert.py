"""``python -m modeling_unime.convert``: the command line of `modeling_unime.export.convert` (the authors' checkpoint
-> a self-contained UniME-V2 checkpoint), kept at this short, stable name."""

from .export.convert import main

if __name__ == "__main__":
    main()
