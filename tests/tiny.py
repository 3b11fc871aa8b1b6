"""Settings that size the cpu-small preset down to the tiny synthetic data and a 2-core machine."""

TINY_OVERRIDES = ["teacher.p_identities=4", "teacher.k_instances=2", "data.loader_workers=0",
                  "data.short_side=160", "data.max_side=256", "student.batch_size=2",
                  "train.log_every_iters=1"]
