"""`python -m pretrain`: train a context encoder (see pretrain/main_pretrain.py for every option)."""
from pretrain.main_pretrain import cli

if __name__ == "__main__":
    cli()
