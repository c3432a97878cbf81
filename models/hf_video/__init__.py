"""Any transformers video model as clip features: ``families`` what differs per model type,
``preprocess`` the model's processor on the device, ``weights`` resolution and loading."""
