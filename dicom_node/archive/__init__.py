"""The archive: instance files on disk plus a patient/study/series/instance index."""
