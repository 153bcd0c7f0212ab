"""Chinese grammatical error correction: the ChERRANT-exact char-level scorer (``align``, ``scorer``), corpora and
noise generation."""
