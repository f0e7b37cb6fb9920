"Exports made by the release before the layout move (fastcls 0.1.0, flat modules) still load and predict the same"
import json
from pathlib import Path
import pytest

fixtures = Path(__file__).parent/'fixtures'
legacy = json.loads((fixtures/'legacy_exports.json').read_text())

@pytest.mark.parametrize('kind', sorted(legacy['probs']))
def test_legacy_export_predicts_the_same(kind, predict_in_fresh_process):
    probs = predict_in_fresh_process(fixtures/f'{kind}.pkl', [fixtures/f for f in legacy['images']])
    import numpy as np
    np.testing.assert_allclose(probs, legacy["probs"][kind], atol=1e-5)
