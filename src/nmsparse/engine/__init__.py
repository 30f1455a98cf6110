"""The engine: what makes a model's weights sparse and keeps them so while it trains.

``sparsify`` / ``finalize`` (:mod:`.make_sparse`), the :class:`~.handle.SparsityHandle` that
the optimizer's step hooks (:mod:`.step_hooks`) drive, one :class:`~.sparse_weight.SparseWeight`
per weight (dense weight, mask, cached forward weight), and :func:`.selection.select`, the one
function that decides which weight gets which pattern and method for every verb. Methods
(:mod:`nmsparse.methods`) and patterns (:mod:`nmsparse.patterns`) plug into it; everything
else in the library goes through it. The public names are re-exported by ``nmsparse``.
"""
