"""glip_pl.label: teacher–student pseudo-labelling of caption shards (noun phrases → teacher GLIP → grounding shards).

``phrases``: spaCy noun phrases with exact spans; ``job``: the labelling job (Lightning ``predict``, resumable);
``datamodule``: ``TeacherStudentDataModule`` (predict loader for the job, gold + pseudo train mix); ``cli``:
``glip-pl pseudo-label --config recipes/label/<name>.yaml``.
"""
