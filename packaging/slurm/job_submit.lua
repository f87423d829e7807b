-- workspace-vmjob's job submit filter for Slurm (docs/vmjobs.md).
--
-- A job submitted with the comment "vm:IMAGE" (sbatch --comment=vm:IMAGE, or
-- "#SBATCH --comment=vm:IMAGE") runs its unchanged batch script inside a VM of
-- IMAGE: this filter replaces the script that slurmctld stores by a small one
-- that hands the original, as a here-document, to
--   sudo -n workspace-vmjob run --image IMAGE --script -
-- on the node. A Prolog cannot do this: it runs before the job, and slurmd
-- then runs the user's script itself. The Epilog (packaging/slurm/epilog)
-- cleans up after a wrapper that was killed outright.
--
-- Install: copy to the directory of slurm.conf as job_submit.lua, set
-- JobSubmitPlugins=lua in slurm.conf, and `scontrol reconfigure`. Change the
-- two paths below if the commands live elsewhere. A comment that starts with
-- "vm:" but names no valid image is refused at submission with one line.

local VMJOB = "/usr/bin/workspace-vmjob"
local SUDO = "/usr/bin/sudo"

function slurm_job_submit(job_desc, part_list, submit_uid)
   local comment = job_desc.comment
   if comment == nil or string.sub(comment, 1, 3) ~= "vm:" or job_desc.script == nil then
      return slurm.SUCCESS
   end
   local image = string.match(comment, "^vm:([%w][%w._-]*)$")
   if image == nil or string.len(image) > 64 then
      slurm.log_user("workspace-vmjob: --comment=%s: not vm:IMAGE (an image name: letters, digits, . _ -)", comment)
      return slurm.ERROR
   end
   -- A here-document end marker that is not a line of the script.
   local marker = "WORKSPACE_VMJOB_SCRIPT_END"
   while string.find(job_desc.script, marker, 1, true) do
      marker = marker .. "_"
   end
   local script = job_desc.script
   if string.sub(script, -1) ~= "\n" then
      script = script .. "\n"
   end
   job_desc.script = "#!/bin/sh\n"
      .. "# workspace-vmjob: this job's own script (below) runs in a VM of image " .. image .. "\n"
      .. "exec " .. SUDO .. " -n " .. VMJOB .. " run --image " .. image .. " --script - <<'" .. marker .. "'\n"
      .. script .. marker .. "\n"
   slurm.log_info("workspace-vmjob: the job of uid %u runs in a VM of image %s", submit_uid, image)
   return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return slurm.SUCCESS
end

return slurm.SUCCESS
