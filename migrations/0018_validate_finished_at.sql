-- 0018: jobs_finished_at_check (0017) is validated, so that it is a guarantee Postgres
-- records (pg_constraint.convalidated) rather than one only 0017's UPDATE made.
--
-- Apart from 0017 because VALIDATE reads the whole table: in 0017's transaction it would
-- have done so under that migration's ACCESS EXCLUSIVE lock, holding off every enqueue
-- and claim meanwhile. Here it takes SHARE UPDATE EXCLUSIVE, which lets them run (it
-- waits for, and holds off, a VACUUM or another schema change of pgqueue.jobs).
ALTER TABLE pgqueue.jobs VALIDATE CONSTRAINT jobs_finished_at_check;
