"""The data: what is read, from where, and how bytes become pictures. Files are reached through the
top-level ``storage`` package (local paths and ``s3://`` URIs behind one API).

* inputs.py: what the label job reads: a folder or prefix listed by streaming, or a manifest;
* manifest_inputs.py: reading a manifest (Parquet or CSV): its columns, its rows, its ``path`` column streamed;
* paths.py: which file a path names and whether it may be read (``--allow-prefix``, confined opens);
* reading.py: reading the files: regular files only, size checked first, bounded per batch, with timeouts;
* decode.py: bytes -> decoded pictures a batch at a time, the decode of label and serve (photos for
  detection, or whole images at each model's input), a bad file an error row; evaluation and training decode
  through core/batches.py (``models.preprocess.decode``, or ``faces.finder.decode_face``);
* datasets/: the labelled data sets' readers (CelebA, UTKFace, SCUT-FBP5500, GENKI-4K, manifests), malformed labels
  reported and skipped;
* yamlsafe.py: YAML from files we do not write (``--model-set`` files), read with a bounded cost;
* traits.py, draw.py, synth.py, compose.py: the random choices of a drawn face and its labels, one drawn face
  with known attributes, drawn faces written in the datasets' formats, and test photos with faces pasted at
  known places.

Imports: ``facedata`` uses ``models`` (preprocessing); ``faces``, ``core``, ``raytasks`` and ``jobs`` use it.
"""
