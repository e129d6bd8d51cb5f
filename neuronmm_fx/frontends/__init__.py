"""Front ends: how a model becomes the graph the passes work on.

``export``  ``optimize()``'s route: ``torch.export`` of the whole model on example inputs.
``dynamo``  the compile route: the graphs ``torch.compile`` hands to the ``neuronmm`` backend.

Both produce graphs whose nodes know their module paths and whose weights resolve to parameters,
which is all that canonicalize needs.
"""
