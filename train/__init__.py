"""Training CLIs (SB3). Installed as ``multispin_train`` (folder ``train/``)."""
