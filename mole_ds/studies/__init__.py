"""Research studies over real DeepSpeed runs; ``tools/scaling_study.py`` and ``tools/conflict_study.py`` are
thin CLIs over these modules.

* ``stats``    mean and t-interval over seeds (answer normalisation: ``mole_ds.answers``)
* ``scaling``  the many-experts sweep over ``mole_ds.train.sweep.run_point`` (resumable; CSV/JSON/PNG)
* ``conflict`` the paper's domain-conflict experiment in miniature (data, base, runs, table, plots)
"""
