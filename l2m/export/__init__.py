"""`python -m l2m.export`: an l2m checkpoint as a Hugging Face transformers folder (l2m.models.hf.to_hf)."""
