"""KCF: the K-fold consistency filter of 3D-DST, the baseline PRF is compared with.

A binned rigid-pose classifier (azimuth, elevation, in-plane theta; 41 bins each) is trained on K-1 folds of
a batch and scores the held-out fold; an image whose annotated pose the classifier finds unlikely (summed
cross-entropy above a threshold) is rejected. Modules: ``kcf.data`` (labels, bins, dataset), ``kcf.model``
(network, LightningModule), ``kcf.folds`` (fold assignment, per-fold training and scoring, resumable work
folder), ``kcf.run`` (config, thresholds, the driver and the SCORES output), ``kcf.threedst`` (3D-DST's own
output layout), ``kcf.cli`` (the ``prf kcf`` command). Importing ``kcf`` itself loads nothing heavy.
"""
