"""The training entry points' code: ``tools/pretrain.py``, ``tools/finetune.py`` and
``tools/linear_probe.py`` each call ``main()`` of the module of the same name here."""
