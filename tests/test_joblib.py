"""joblib's tasks on a cw cluster (``import cw.joblib``): joblib's own
Parallel/delayed with functions defined here, and scikit-learn's
GridSearchCV(n_jobs=-1), both checked to run on the workers' pids."""
from __future__ import annotations

import os

import pytest

joblib = pytest.importorskip("joblib")

import cw.joblib  # noqa: E402,F401 - registers the backend "cw"


def test_parallel_runs_closures_on_the_workers(cluster):
    offset = 100

    def where(i):
        return i + offset, os.getpid()

    with cluster.executor() as ex:
        workers = {w.pid for w in ex.workers()}
        with joblib.parallel_config(backend="cw", executor=ex):
            out = joblib.Parallel(n_jobs=-1)(joblib.delayed(where)(i) for i in range(200))
    assert [r for r, _ in out] == [i + 100 for i in range(200)]
    assert {pid for _, pid in out} <= workers and os.getpid() not in {pid for _, pid in out}


def test_an_exception_in_one_call_reaches_the_caller_and_cancels_the_rest(cluster):
    def fails_on(i):
        if i == 3:
            raise KeyError(f"no {i}")
        return i

    with cluster.executor() as ex, joblib.parallel_config(backend="cw", executor=ex):
        with pytest.raises(KeyError, match="no 3"):
            joblib.Parallel(n_jobs=2)(joblib.delayed(fails_on)(i) for i in range(50))
        # The backend still works afterwards.
        assert joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(-i) for i in range(5)) == list(range(5))


def test_n_jobs_minus_one_is_every_connected_worker(cluster):
    with cluster.executor() as ex, joblib.parallel_config(backend="cw", executor=ex):
        assert joblib.effective_n_jobs(-1) == 2


def test_grid_search_runs_on_the_workers(cluster, tmp_path):
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC
    assert sklearn

    X, y = make_classification(n_samples=200, n_features=8, random_state=0)
    fits = tmp_path / "fits"
    fits.mkdir()

    class RecordingSVC(SVC):       # defined here (by value to the workers): leaves a mark where it is fitted
        def fit(self, X, y, **kw):
            (fits / f"{os.getpid()}.{len(os.listdir(fits))}.{id(self)}").touch()
            return super().fit(X, y, **kw)

    with cluster.executor() as ex:
        workers = {w.pid for w in ex.workers()}
        search = GridSearchCV(RecordingSVC(), {"C": [0.1, 1, 10], "gamma": ["scale", 0.1]}, cv=3, n_jobs=-1)
        with joblib.parallel_config(backend="cw", executor=ex):
            search.fit(X, y)
    assert len(search.cv_results_["params"]) == 6 and search.best_score_ > 0.5
    pids = [int(name.split(".")[0]) for name in os.listdir(fits)]
    # 6 candidates x 3 folds on the workers; the refit of the best one in this process, as sklearn does.
    assert sorted(pid for pid in pids if pid != os.getpid()) and {p for p in pids if p != os.getpid()} <= workers
    assert sum(pid in workers for pid in pids) == 18 and pids.count(os.getpid()) == 1
