"""Workers: the process that runs jobs, and the supervisor that keeps N of
them.  ``python -m cw.worker HOST -n N``."""
