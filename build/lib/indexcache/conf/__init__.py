"""indexcache's Hydra config files, installed as the package data `indexcache.conf`."""
