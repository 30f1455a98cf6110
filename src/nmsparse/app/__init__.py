"""The application: the ``nmsparse`` command line (:mod:`.cli`), its trainer (:mod:`.train`),
and the model (:mod:`.models`) and data (:mod:`.data`) zoos and the lottery-ticket harness
(:mod:`.lottery`) it runs.

It is built on the library's public API only (``import nmsparse``); the library never imports
it, so ``import nmsparse`` loads no trainer, command line or data set.
"""
