"""One file per architecture; each supplies only its selection rule (see sae/base.py)."""
