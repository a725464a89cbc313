"""Spectra: per-token attention metrics from Hugging Face causal language models.

    python -m spectra.run                                  # SmolLM2-135M on the built-in corpus, CPU
    python -m spectra.run model=llama3_8b hardware=h100    # Llama-3-8B on a large GPU
"""

__version__ = "0.1.0"
