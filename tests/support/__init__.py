"""What the tests and the benchmarks stand on: the harnesses of real parts and the helpers they share.

Real Slurm (:mod:`.slurm_cluster`) and Grid Engine (:mod:`.sge_cluster`)
clusters, libvirtd (:mod:`.libvirt_daemon`), nodes as network namespaces
(:mod:`.netlab`, :mod:`.netnode`), image endorsers and mirrors
(:mod:`.imagesource`), the one named fake (:mod:`.fakes`: Xen's ``xl``).
Test modules and ``bench/`` import from here, never from a test module.
"""
