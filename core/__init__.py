"""The product without Ray: one way from image bytes to rows, and the training loop's steps.

* annotator.py: :class:`Annotator`, decoded pictures -> faces -> every model -> rows, for one checkpoint
  (flat rows) or a model set (a struct per model); label's actors, serve's replicas and scripts call it;
* rows.py: the rows' schema and the one builder of their per-image and per-face columns;
* runner.py: :class:`ModelRunner`, one checkpoint on its device (folded, channels_last, bf16, compiled);
* modelset.py: what a user names to label with (one checkpoint, ``--checkpoint`` several times, a
  ``--model-set`` file), the rules for a set's names and version, and its identity;
* engine.py: the training loop's pieces (optimisers, one step, validation statistics, one epoch of steps and
  the row of its validation); raytasks/train's DDP worker runs them, and so does ``fit``, the same epochs in
  one process without checkpoints, which the tests and bench/ call (the product trains through Ray Train
  only); selection.py: the metric that picks the best epoch, and early stopping;
  batches.py: dataset rows -> batches (whole images or each row's aligned face); augment.py: the training
  augmentation, on the device, in the aligned frame; averaging.py: the mean of the last epochs' weights that
  a recipe may validate and save; evaluation.py: metrics, calibration error and groups over a table, what
  ``jobs.evaluate`` runs (it takes only ``sample_rows`` from engine.py).

Imports: ``core`` uses ``models``, ``facedata`` and ``faces``; ``raytasks`` and ``jobs`` use ``core``.
"""
