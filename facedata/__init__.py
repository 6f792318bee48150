"""The data: what is read, from where, and how bytes become pictures.

* storage.py: local paths and ``s3://`` URIs behind one API (pyarrow filesystems), bounded reads and writes;
* inputs.py: what the label job reads: a folder or prefix listed by streaming, or a manifest;
* paths.py: which file a path names and whether it may be read (``--allow-prefix``, confined opens);
* reading.py: reading the files: regular files only, size checked first, bounded per batch, with timeouts;
* decode.py: bytes -> decoded pictures a batch at a time, the one decode loop of label, serve and evaluate
  (photos for detection, or whole images at each model's input), a bad file an error row;
* datasets.py: the labelled data sets' readers (CelebA, UTKFace, SCUT-FBP5500, manifests), malformed labels
  reported and skipped;
* draw.py, synth.py, compose.py: one drawn face with known attributes, drawn faces written in the datasets'
  formats, and test photos with faces pasted at known places.

Imports: ``facedata`` uses ``models`` (preprocessing); ``faces``, ``core``, ``raytasks`` and ``jobs`` use it.
"""
