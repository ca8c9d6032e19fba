-- 0020: dead_jobs_state_check (0019) is validated apart from 0019, under SHARE UPDATE
-- EXCLUSIVE, which lets dead-lettering go on while it reads the table (see 0018).
ALTER TABLE pgqueue.dead_jobs VALIDATE CONSTRAINT dead_jobs_state_check;
