"""VGGish (AudioSet) audio embeddings: ``Ta x 128``, one row per 0.96 s of audio.

``net`` holds the network and the AudioSet PCA post-processor, ``mel`` the log-mel front end,
``weights`` the checkpoint cards and loaders (including Google's TensorFlow checkpoint),
``extractor`` the per-input pipeline. Importing this package never imports tensorflow.
"""
