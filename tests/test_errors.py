from halo_balance.errors import HaloBalanceError, did_you_mean, unknown_choice


def test_did_you_mean_suggests_the_closest_choice_only_when_close():
    assert did_you_mean("fairply", ["original", "fairplay"]) == " (did you mean 'fairplay'?)"
    assert did_you_mean("xgb", ["original", "fairplay"]) == ""


def test_unknown_choice_names_every_bad_value_and_lists_the_choices():
    err = unknown_choice("--methods", ["smot", "qqq"], ["original", "smote"])
    assert isinstance(err, HaloBalanceError)
    assert str(err) == "--methods: unknown 'smot' (did you mean 'smote'?), 'qqq'; choose from original, smote"


def test_unknown_choice_returns_the_requested_error_class():
    from halo_balance.errors import DatasetError

    err = unknown_choice("group attribute", ["gendr"], ["gender", "race"], error=DatasetError)
    assert isinstance(err, DatasetError) and isinstance(err, ValueError)
    assert str(err) == "group attribute: unknown 'gendr' (did you mean 'gender'?); choose from gender, race"
    assert type(unknown_choice("metric", ["jacard"], ["jaccard"], error=ValueError)) is ValueError
