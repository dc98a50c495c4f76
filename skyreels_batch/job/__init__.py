"""The driver's side of a job: the door, the work list, render passes and what they return, resources and the
cluster, the output's lease, progress lines, and the command line. `job.pipeline.run_job` is the whole job."""
