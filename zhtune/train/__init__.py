"""Training layer: the explicit loop (``loop``), its data schedule (``schedule``) and atomic checkpoints
(``checkpoint``)."""
