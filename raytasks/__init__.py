"""The three Ray programs, each in its own folder, holding only what makes it a Ray program.

* label/: Ray Data stages (read and decode tasks, the annotator actor pool), the lease and the output folder;
* serve/: the Serve application (HTTP ingress, the annotator deployments, their configuration);
* train/: the TorchTrainer driver, the DDP worker, the Ray Data training batches.

What they share without Ray lives in ``core`` (bytes -> rows; the training loop's steps); threads.py is the
one piece of Ray process plumbing the label actors and serve replicas share.
"""
