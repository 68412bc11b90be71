"""earmark's contracts: the records and tables that pass between its stages, in one place.

* :mod:`records.clips`: clip identity (``clip_id``) and a clip to transcribe (:class:`~records.clips.ClipRef`);
* :mod:`records.pseudo_labels`: the pseudo-label record (words, sentences, the row), its Arrow
  schema and the converters to and from rows and tables;
* :mod:`records.manifest`: the NeMo manifest record, its one reader and its one writer;
* :mod:`records.text`: language tags, the one text normaliser, WER and CER.

This package imports nothing else of earmark's and nothing heavy (the standard library, numpy,
pyarrow and jiwer, each only where used), so every other package may import it.
"""
