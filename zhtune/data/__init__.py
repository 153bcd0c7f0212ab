"""Data layer: read instruction data (``formats``), render it with a chat template (``templates``), turn it
into ids and labels (``tokenize``) and pack it into fixed-length rows (``packing``)."""
