"""CLAP (LAION, through Hugging Face transformers) audio embeddings: ``Ta x 512``, one row per
window of the 48 kHz audio track.

``frontend`` is the ClapFeatureExtractor's log-mel front end in torch (batched, on the device),
``weights`` the hub cache / local folder resolution and the strict loading of the audio (and,
for show_pred, text) tower, ``extractor`` the per-input windowing on the audio seam.
"""
