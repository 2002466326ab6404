"""Video re-ID data: dataset readers, a synthetic dataset writer, P x K sampling and clip loaders.

- :mod:`fastnl.data.datasets`: MARS, DukeMTMC-VideoReID and the registry ``get_dataset``.
- :mod:`fastnl.data.synthetic`: ``write_dataset`` (the same on-disk layouts, learnable ids).
- :mod:`fastnl.data.sampling`: frame sampling and the ``PKSampler``.
- :mod:`fastnl.data.loader`: ``build_train_loader`` / ``build_test_loader`` (torch or DALI).
"""
