"""glip_pl.label: teacher–student pseudo-labelling of caption shards (noun phrases → teacher GLIP → grounding shards).

``phrases``: spaCy noun phrases with exact spans; ``job``: the labelling job (Lightning ``predict``, resumable),
its rooms listed in its docstring; ``datamodule``: the job's predict loader and ``TeacherStudentDataModule`` (gold +
pseudo train mix); ``score``: pseudo labels against true boxes; ``cli``: ``glip-pl pseudo-label --config
recipes/label/<name>.yaml``.
"""
