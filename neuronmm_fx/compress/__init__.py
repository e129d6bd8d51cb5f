"""Compression: which rank each matrix gets and its factors; no graph is touched here.

``calibration``  the tokens compression is measured on (the user's, or text the model writes itself)
``layerwise``    run a model one block at a time on cached calibration hidden states
``sensitivity``  each matrix's loss curve (Fisher-weighted whitened truncation error)
``ranks``        the uniform rule and the global allocation under the parameter budget
``factorize``    truncated and whitened SVD, and the outcome per projection of a site
``sequential``   block-by-block factors on the compressed model's own activations
``strategy``     the plan: calibration → loss curves → ranks → factorizers, per site
``finetune``     optional distillation of the installed factors
"""
