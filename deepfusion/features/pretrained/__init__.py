"""Pretrained music networks shipped with deepfusion: their weights, their exact input
representation and their PyTorch ports (:mod:`deepfusion.features.pretrained.musicnn`)."""
